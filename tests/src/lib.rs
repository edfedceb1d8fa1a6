//! Harness for the end-to-end tests: starts the real `tiandi-controller` and `tiandi-agent`
//! binaries (built by `cargo build --workspace --bins`, which the README's test command runs
//! first), real `snmpd`, and talks to them over their real interfaces.

pub mod browser;
pub mod container;
pub mod snmpd;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Directory of the workspace's built binaries (next to this test's `deps/`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(|d| {
            if d.ends_with("deps") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the tests",
        p.display()
    );
    p
}

pub fn free_tcp() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

pub fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Polls `f` every 100 ms until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

pub fn get_json(url: &str) -> Option<Value> {
    get_json_as(url, None)
}

/// GET `url` with `Authorization: Bearer TOKEN`: the JSON body of a success.
pub fn get_json_as(url: &str, token: Option<&str>) -> Option<Value> {
    let mut req = http().get(url);
    if let Some(t) = token {
        req = req.header("Authorization", &format!("Bearer {}", t.trim()));
    }
    let mut r = req.call().ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.body_mut().read_json().ok()
}

pub fn get_text(url: &str) -> Option<String> {
    let mut r = http().get(url).call().ok()?;
    r.body_mut().read_to_string().ok()
}

/// A controller process with its own data dir and ports.
pub struct ControllerProc {
    pub dir: PathBuf,
    pub quic: SocketAddr,
    pub api: SocketAddr,
    pub ops: SocketAddr,
    pub config: PathBuf,
    child: Option<Child>,
    log: PathBuf,
    /// The network namespace it runs in (None: the test's own).
    pub netns: Option<String>,
    /// The subcommand and its flags (`run`, or `demo --sites N …`).
    args: Vec<String>,
}

/// A command for `program`, inside network namespace `ns` if given.
pub fn command_in(ns: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match ns {
        Some(ns) => tiandi_satlink::Topology::command(ns, program),
        None => Command::new(program),
    }
}

/// Runs `f` inside network namespace `ns` if given (HTTP to a process listening there).
pub fn run_in<T: Send + 'static>(ns: Option<&str>, f: impl FnOnce() -> T + Send + 'static) -> T {
    match ns {
        Some(ns) => tiandi_satlink::topo::in_netns(ns, f).expect("entering the namespace"),
        None => f(),
    }
}

impl ControllerProc {
    pub fn start(dir: &Path) -> ControllerProc {
        ControllerProc::start_with(dir, None, "")
    }

    /// Starts a controller with `extra_config` (TOML) appended; with `netns`, inside that
    /// namespace, its QUIC listener on the given address (API and metrics on its loopback).
    pub fn start_with(
        dir: &Path,
        netns: Option<(&str, std::net::IpAddr)>,
        extra_config: &str,
    ) -> ControllerProc {
        ControllerProc::start_with_profile(dir, netns, "terrestrial", extra_config)
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = command_in(self.netns.as_deref(), bin("tiandi-controller"))
            .arg("--config")
            .arg(&self.config)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let url = format!("http://{}/health", self.ops);
        // Up within a minute (a loaded CI machine runs two tests at once); if not, or if it
        // exits, the failure shows the end of its log.
        let start = Instant::now();
        loop {
            let u = url.clone();
            if run_in(self.netns.as_deref(), move || get_text(&u)).is_some() {
                break;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || start.elapsed() > Duration::from_secs(60) {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                panic!(
                    "controller /health: {} after {:?}; the end of its log:\n{}",
                    exited.map_or("no answer".to_string(), |s| format!("exited with {s}")),
                    start.elapsed(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Graceful stop (SIGTERM), waiting for the process to exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            sigterm(&c);
            let start = Instant::now();
            while c.try_wait().unwrap().is_none() {
                if start.elapsed() > Duration::from_secs(20) {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// SIGKILL, then start again on the same data dir.
    pub fn kill9_and_restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.spawn();
    }

    /// GET an API route with the read token.
    pub fn api(&self, path: &str) -> Option<Value> {
        let url = format!("http://{}{}", self.api, path);
        let token = self.read_token();
        run_in(self.netns.as_deref(), move || {
            get_json_as(&url, Some(&token))
        })
    }

    /// The data directory the controller runs on.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The token of the read routes (`data/read.token`), made at the controller's first start.
    pub fn read_token(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("read.token"))
            .map(|t| t.trim().to_string())
            .unwrap_or_default()
    }

    /// The admin token (`data/admin.token`).
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("admin.token"))
            .map(|t| t.trim().to_string())
            .unwrap_or_default()
    }

    pub fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.ops);
        run_in(self.netns.as_deref(), move || get_text(&url)).unwrap_or_default()
    }

    /// A metric's value (first sample whose line starts with `name`).
    pub fn metric(&self, name: &str) -> f64 {
        self.metrics()
            .lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// `tiandi-controller enroll` through the CLI; returns the token.
    pub fn enroll(&self, site: &str, province: &str, extra: &[&str]) -> String {
        let out = self.cli(&[&["enroll", "--site", site, "--province", province], extra].concat());
        assert!(
            out.status.success(),
            "enroll failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// A site enrolled with a token from this controller (`tiandi-agent enroll`), in `dir`,
    /// with `config` added to its configuration; not started yet.
    pub fn new_site(&self, dir: &Path, site: &str, province: &str, config: &str) -> AgentProc {
        let token = self.enroll(site, province, &[]);
        AgentProc::enroll(dir, self.quic, &token, config)
    }

    /// `tiandi-controller --config … ARGS` (in the controller's namespace).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        run_cli(
            self.netns.as_deref(),
            "tiandi-controller",
            &self.config,
            args,
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sequence numbers of a site's stored history, in time order.
    pub fn history_seqs(&self, site: &str) -> Vec<u64> {
        let v = self
            .api(&format!(
                "/api/sites/{site}/history?metric=report.seq&from=0&limit=100000"
            ))
            .expect("history");
        v["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p[1].as_f64().unwrap() as u64)
            .collect()
    }
}

impl Drop for ControllerProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An agent process.
pub struct AgentProc {
    pub dir: PathBuf,
    pub config: PathBuf,
    child: Option<Child>,
    log: PathBuf,
    /// The network namespace it runs in (None: the test's own).
    pub netns: Option<String>,
}

impl AgentProc {
    /// Enrolls (with `token`) and writes a config; does not start.
    pub fn enroll(
        dir: &Path,
        controller: SocketAddr,
        token: &str,
        extra_config: &str,
    ) -> AgentProc {
        AgentProc::enroll_in(None, dir, controller, token, extra_config)
    }

    /// [`AgentProc::enroll`] inside network namespace `ns`, where it will also run.
    pub fn enroll_in(
        ns: Option<&str>,
        dir: &Path,
        controller: SocketAddr,
        token: &str,
        extra_config: &str,
    ) -> AgentProc {
        std::fs::create_dir_all(dir).unwrap();
        let data = dir.join("data");
        let out = command_in(ns, bin("tiandi-agent"))
            .args([
                "enroll",
                "--controller",
                &controller.to_string(),
                "--token",
                token,
                "--data-dir",
            ])
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "agent enroll failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut a = AgentProc::configure(dir, controller, extra_config);
        a.netns = ns.map(str::to_string);
        a
    }

    pub fn configure(dir: &Path, controller: SocketAddr, extra_config: &str) -> AgentProc {
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "controller = \"{controller}\"\ndata_dir = {:?}\nprofile = \"terrestrial\"\nlog = \"info,tiandi_agent=debug,tiandi_uplink=debug\"\n{}{extra_config}\n",
                dir.join("data"),
                // The machine's own default gateway is not the test's to ping: a test that
                // wants the next-hop check sets up its own namespace and `[reachability]`.
                if extra_config.contains("[reachability]") {
                    ""
                } else {
                    "reachability = { next_hop = false }\n"
                }
            ),
        )
        .unwrap();
        AgentProc {
            dir: dir.to_path_buf(),
            config,
            child: None,
            log: dir.join("agent.log"),
            netns: None,
        }
    }

    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child = Some(
            command_in(self.netns.as_deref(), bin("tiandi-agent"))
                .arg("--config")
                .arg(&self.config)
                .arg("run")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            sigterm(&c);
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `tiandi-agent --config … ARGS` (in the agent's namespace).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        run_cli(self.netns.as_deref(), "tiandi-agent", &self.config, args)
    }
}

/// One of our binaries with its configuration file and `args`, in `netns` if given; its output.
fn run_cli(
    netns: Option<&str>,
    binary: &str,
    config: &Path,
    args: &[&str],
) -> std::process::Output {
    command_in(netns, bin(binary))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

/// `len` bytes of a repeatable, incompressible-looking pattern (test files).
pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect()
}

/// Whether this process can build emulated links (root and /dev/net/tun, as in CI).
pub fn can_emulate_links() -> bool {
    let uid = Command::new("id").arg("-u").output().map(|o| o.stdout);
    uid.is_ok_and(|u| String::from_utf8_lossy(&u).trim() == "0")
        && Path::new("/dev/net/tun").exists()
}

/// Bytes the interface `dev` in namespace `ns` has sent.
pub fn tx_bytes(ns: &str, dev: &str) -> u64 {
    let out = tiandi_satlink::Topology::command(ns, "cat")
        .arg(format!("/sys/class/net/{dev}/statistics/tx_bytes"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

impl ControllerProc {
    /// [`ControllerProc::start_with`] with the QUIC transport profile `profile` (`geo`, `leo`,
    /// `terrestrial`) instead of `terrestrial`: what a controller serving satellite sites runs
    /// (the profile sets the initial RTT and the flow-control windows a long link needs).
    pub fn start_with_profile(
        dir: &Path,
        netns: Option<(&str, std::net::IpAddr)>,
        profile: &str,
        extra_config: &str,
    ) -> ControllerProc {
        ControllerProc::start_args(dir, netns, profile, extra_config, &["run"])
    }

    /// `tiandi-controller demo`: the controller with `sites` simulated sites reporting every
    /// `interval_s` seconds, and the demo's console accounts (`demo-logins.txt` in its data
    /// directory; [`ControllerProc::demo_password`]).
    pub fn start_demo(
        dir: &Path,
        sites: usize,
        interval_s: f64,
        extra_config: &str,
    ) -> ControllerProc {
        let (n, i) = (sites.to_string(), interval_s.to_string());
        ControllerProc::start_args(
            dir,
            None,
            "terrestrial",
            extra_config,
            &["demo", "--sites", &n, "--interval", &i],
        )
    }

    /// `tiandi-controller standby --primary PRIMARY --token TOKEN` in `dir` (its own QUIC,
    /// API and ops addresses; `/health` on ops answers while it follows).
    pub fn start_standby(
        dir: &Path,
        primary: SocketAddr,
        token: &str,
        extra_config: &str,
    ) -> ControllerProc {
        let p = primary.to_string();
        ControllerProc::start_args(
            dir,
            None,
            "terrestrial",
            extra_config,
            &["standby", "--primary", &p, "--token", token],
        )
    }

    /// GET a JSON route of the ops listener (`/health/replica`, a standby's `/health`).
    pub fn ops_json(&self, path: &str) -> Option<Value> {
        let url = format!("http://{}{}", self.ops, path);
        run_in(self.netns.as_deref(), move || get_json_as(&url, None))
    }

    /// SIGKILL, and no restart.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again (after `kill9` or `stop`) with the same arguments; panics with the end of
    /// the log if it does not come up.
    pub fn start_again(&mut self) {
        self.spawn();
    }

    /// A demo account's password.
    pub fn demo_password(&self, user: &str) -> String {
        let file = self.data_dir().join("demo-logins.txt");
        let text = wait_for("demo-logins.txt", Duration::from_secs(30), || {
            std::fs::read_to_string(&file).ok()
        });
        text.lines()
            .find_map(|l| {
                let mut w = l.split_whitespace();
                (w.next() == Some(user)).then(|| w.next().map(str::to_string))?
            })
            .unwrap_or_else(|| panic!("no demo account {user} in {}", file.display()))
    }

    fn start_args(
        dir: &Path,
        netns: Option<(&str, std::net::IpAddr)>,
        profile: &str,
        extra_config: &str,
        args: &[&str],
    ) -> ControllerProc {
        std::fs::create_dir_all(dir).unwrap();
        let (quic, api, ops) = match netns {
            Some((_, ip)) => (
                SocketAddr::new(ip, 4433),
                "127.0.0.1:18080".parse().unwrap(),
                "127.0.0.1:19090".parse().unwrap(),
            ),
            None => (free_udp(), free_tcp(), free_tcp()),
        };
        let config = dir.join("controller.toml");
        // Tests send files from their temporary directories (the data dir stays refused);
        // a test that sets `outgoing_dirs` itself gets its own.
        let outgoing = if extra_config.contains("outgoing_dirs") {
            String::new()
        } else {
            format!("outgoing_dirs = [{:?}]\n", std::env::temp_dir())
        };
        std::fs::write(
            &config,
            format!(
                "data_dir = {:?}\nquic_listen = \"{quic}\"\napi_listen = \"{api}\"\nops_listen = \"{ops}\"\nprofile = {profile:?}\nlog = \"info,tiandi_controller=debug\"\n{outgoing}{extra_config}\n",
                dir.join("data")
            ),
        )
        .unwrap();
        let mut c = ControllerProc {
            dir: dir.to_path_buf(),
            quic,
            api,
            ops,
            config,
            child: None,
            log: dir.join("controller.log"),
            netns: netns.map(|(ns, _)| ns.to_string()),
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        c.spawn();
        c
    }
}

impl AgentProc {
    /// Sets the QUIC transport profile in the agent's config (`geo`, `leo`, `terrestrial`;
    /// [`AgentProc::configure`] writes `terrestrial`); takes effect at the next `start`.
    pub fn set_profile(&self, profile: &str) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let text = text.replacen(
            "profile = \"terrestrial\"\n",
            &format!("profile = {profile:?}\n"),
            1,
        );
        assert!(
            text.contains(&format!("profile = {profile:?}\n")),
            "no profile line in {}",
            self.config.display()
        );
        std::fs::write(&self.config, text).unwrap();
    }
}

/// Asks `child` to stop (SIGTERM), as an operator's `kill` or systemd would: the binaries
/// under test shut down gracefully on it. Sent directly, not through the `kill` command (a
/// minimal Debian has no procps).
fn sigterm(child: &std::process::Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
}

/// Bytes that neither deduplicate nor compress (xorshift64*), reproducible by seed.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `tiandi-backup --repo REPO --json [--password-file PW] ARGS` (the passphrase variable
/// removed from its environment); its output.
pub fn backup_cli(repo: &Path, pw: Option<&Path>, args: &[&str]) -> std::process::Output {
    let mut c = Command::new(bin("tiandi-backup"));
    c.arg("--repo").arg(repo).arg("--json");
    if let Some(p) = pw {
        c.arg("--password-file").arg(p);
    }
    c.args(args)
        .env_remove("TIANDI_BACKUP_PASSWORD_FILE")
        .output()
        .unwrap()
}

/// A command's JSON output; panics with its stdout and stderr when it failed.
pub fn ok_json(o: &std::process::Output) -> Value {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Writes a secret file of mode 0600.
pub fn secret_file(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}
