//! `dashboard`: the web console at scale. A release controller with N simulated sites
//! (`tiandi-agent simulate --outages`: rain fades, mains failures and link outages change
//! sites' states all the time), then:
//! - **A**: the filtered, sorted site list (`GET /api/sites?…&limit=100`: a random province or
//!   none, a random status or none, sometimes a text filter, a random sort column and order, a
//!   random page) from 20 concurrent clients with a user's API token, for a bounded count and
//!   time: the p99 latency;
//! - **P**: headless Chromium, cold (a fresh profile: nothing cached), logged in by a
//!   `/api/login` fetch before the first page: from navigation start to the site table showing its
//!   first rows (`window.__tiandi.firstRowsAt`, the page's own performance clock); the median
//!   of three cold browsers;
//! - **L**: the overview open in Chromium for a while: for every site or alarm event the page
//!   showed, the time from the controller's event (its `at_ms`) to the page showing it
//!   (`Date.now()` after the DOM update; same machine, same clock): the p99.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tiandi_tests::browser::Browser;

use crate::ingest::{Ctl, free_tcp, get_as, http, percentile, release_binaries, token, wait};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 20_000)]
    sites: usize,
    /// Seconds between reports.
    #[arg(long, default_value_t = 10.0)]
    interval: f64,
    /// Concurrent API clients.
    #[arg(long, default_value_t = 20)]
    clients: usize,
    /// Requests per client (A), at most.
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// Seconds the overview stays open (L).
    #[arg(long, default_value_t = 60.0)]
    watch: f64,
}

const PROVINCES: [&str; 31] = [
    "BJ", "TJ", "HE", "SX", "NM", "LN", "JL", "HL", "SH", "JS", "ZJ", "AH", "FJ", "JX", "SD", "HA",
    "HB", "HN", "GD", "GX", "HI", "CQ", "SC", "GZ", "YN", "XZ", "SN", "GS", "QH", "NX", "XJ",
];
const STATUSES: [&str; 6] = [
    "up",
    "degraded",
    "down",
    "rain-fade",
    "on-battery",
    "disk-full",
];
const SORTS: [&str; 11] = [
    "site_id",
    "province",
    "status",
    "last_seen",
    "rtt",
    "loss",
    "esno",
    "modcod",
    "rx_rate",
    "tx_rate",
    "cpu",
];

/// A random query of the site table, as an operator's clicks make them.
fn random_query(rng: &mut impl rand::Rng, sites: usize) -> String {
    let mut q = vec!["limit=100".to_string()];
    if rng.random_bool(0.5) {
        q.push(format!("province={}", PROVINCES[rng.random_range(0..31)]));
    }
    if rng.random_bool(0.3) {
        q.push(format!("status={}", STATUSES[rng.random_range(0..6)]));
    }
    if rng.random_bool(0.2) {
        q.push(format!("q={}", rng.random_range(1..100)));
    }
    q.push(format!("sort={}", SORTS[rng.random_range(0..SORTS.len())]));
    q.push(format!(
        "order={}",
        if rng.random_bool(0.5) { "asc" } else { "desc" }
    ));
    let pages = (sites / 100).max(1);
    q.push(format!(
        "offset={}",
        100 * rng.random_range(0..pages.min(20))
    ));
    q.join("&")
}

fn login_cookie(api: std::net::SocketAddr, user: &str, password: &str) -> anyhow::Result<String> {
    let r = http()
        .post(&format!("http://{api}/api/login"))
        .send_json(json!({"user": user, "password": password}))?;
    if r.status() != 200 {
        bail!("logging in as {user}: {}", r.status());
    }
    let set = r
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .context("no session cookie")?;
    let kv = set.split(';').next().unwrap_or_default();
    Ok(kv
        .split_once('=')
        .map(|(_, v)| v.to_string())
        .unwrap_or_default())
}

fn ctl_cli(bin: &Path, config: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(bin)
        .arg("--config")
        .arg(config)
        .args(args)
        .stderr(Stdio::piped())
        .output()?;
    if !out.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let b = release_binaries(&["tiandi-controller", "tiandi-agent"])?;
    let (ctl_bin, agent_bin) = (b[0].clone(), b[1].clone());
    let tmp = tempfile::Builder::new().prefix("tiandi-bench-").tempdir()?;
    let dir = tmp.path();
    let quic = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
    let (api, ops) = (free_tcp(), free_tcp());
    let config = dir.join("controller.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nquic_listen = \"{quic}\"\napi_listen = \"{api}\"\nops_listen = \"{ops}\"\nprofile = \"terrestrial\"\nlog = \"warn\"\n[console]\nadmin_password_file = {:?}\n",
            dir.join("ctl"),
            dir.join("admin.pw"),
        ),
    )?;
    let password = "bench password 2026";
    tiandi_link::pki::write_private(&dir.join("admin.pw"), password)?;
    let mut ctl = Ctl {
        bin: ctl_bin.clone(),
        config: config.clone(),
        ops,
        log: dir.join("controller.log"),
        child: None,
    };
    ctl.start()?;
    eprintln!("enrolling {} sites...", a.sites);
    let tokens = dir.join("tokens.txt");
    let n = a.sites.to_string();
    ctl_cli(
        &ctl_bin,
        &config,
        &[
            "enroll",
            "--batch",
            &n,
            "--out",
            &tokens.display().to_string(),
        ],
    )?;
    let sim_log = std::fs::File::create(dir.join("sim.log"))?;
    let mut sim = Command::new(&agent_bin)
        .args([
            "simulate",
            "--outages",
            "--controller",
            &quic.to_string(),
            "--tokens",
        ])
        .arg(&tokens)
        .arg("--data-dir")
        .arg(dir.join("sim"))
        .args(["--interval", &a.interval.to_string()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(sim_log)
        .spawn()?;
    let read = token(&dir.join("ctl"), "read.token");
    // `--outages` keeps some sites' links down from the start (3 % are outage-prone, down for
    // one to four minutes at a time), so "every site" is 97 % of them.
    let enough = a.sites as u64 * 97 / 100;
    let setup = wait(
        "97 % of the sites connected",
        Duration::from_secs(2400),
        || {
            get_as(&format!("http://{api}/api/summary"), &read)
                .is_some_and(|v| v["connected"].as_u64().is_some_and(|c| c >= enough))
        },
    )?;
    eprintln!(
        "{enough} of {} sites connected in {:.1} s",
        a.sites,
        setup.as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs_f64(a.interval * 1.5));

    // A: the site list under concurrent clients, with a user's own API token.
    let cookie = login_cookie(api, "admin", password)?;
    let csrf: Value = http()
        .get(&format!("http://{api}/api/me"))
        .header("cookie", &format!("tiandi_session={cookie}"))
        .call()?
        .body_mut()
        .read_json()?;
    let made: Value = http()
        .post(&format!("http://{api}/api/me/tokens"))
        .header("cookie", &format!("tiandi_session={cookie}"))
        .header("x-csrf-token", csrf["csrf"].as_str().unwrap_or_default())
        .send_json(json!({"label": "bench"}))?
        .body_mut()
        .read_json()?;
    let api_token = made["token"].as_str().context("an API token")?.to_string();
    let lat = Arc::new(Mutex::new(Vec::<i64>::new()));
    let deadline = Instant::now() + Duration::from_secs(120);
    let workers: Vec<_> = (0..a.clients)
        .map(|i| {
            let (lat, t, requests, sites) = (lat.clone(), api_token.clone(), a.requests, a.sites);
            std::thread::spawn(move || {
                use rand::SeedableRng;
                let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64);
                let agent = http();
                for _ in 0..requests {
                    if Instant::now() > deadline {
                        break;
                    }
                    let url = format!("http://{api}/api/sites?{}", random_query(&mut rng, sites));
                    let t0 = Instant::now();
                    let ok = agent
                        .get(&url)
                        .header("Authorization", &format!("Bearer {t}"))
                        .call()
                        .ok()
                        .and_then(|mut r| r.body_mut().read_to_vec().ok().map(|_| r.status()))
                        .is_some_and(|s| s == 200);
                    let ms = t0.elapsed().as_secs_f64() * 1000.0;
                    if ok {
                        lat.lock().expect("lock").push((ms * 1000.0) as i64);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let mut l = lat.lock().expect("lock").clone();
    l.sort_unstable();
    let api_p99 = percentile(&l, 0.99) as f64 / 1000.0;
    eprintln!(
        "A: {} requests, p50 {:.1} ms, p99 {api_p99:.1} ms",
        l.len(),
        percentile(&l, 0.5) as f64 / 1000.0
    );

    // P: cold browsers, each logged in (`/api/login` from the licence text, a page of the
    // origin that loads nothing the console uses) before its first console page.
    let mut loads = Vec::new();
    for _ in 0..3 {
        let b = Browser::start();
        b.goto(&format!("http://{api}/assets/LICENCES.md"));
        b.log_in_by_api("admin", password);
        b.goto(&format!("http://{api}/sites"));
        let v = b.wait_js(
            "the site table's first rows",
            "window.__tiandi && window.__tiandi.firstRowsAt",
            Duration::from_secs(30),
        );
        loads.push((v.as_f64().unwrap_or(-1.0)) as i64);
    }
    loads.sort_unstable();
    let page_ms = loads[1];
    eprintln!("P: cold loads {loads:?} ms");

    // L: the overview open while sites change.
    let b = Browser::start();
    b.goto(&format!("http://{api}/assets/LICENCES.md"));
    b.log_in_by_api("admin", password);
    b.goto(&format!("http://{api}/"));
    b.wait_js(
        "the overview",
        "document.documentElement.dataset.ready === '1'",
        Duration::from_secs(30),
    );
    b.js("window.__tiandi.live = []; return 1", vec![]);
    std::thread::sleep(Duration::from_secs_f64(a.watch));
    let live = b.js("return window.__tiandi.live", vec![]);
    let mut ll: Vec<i64> = live
        .as_array()
        .map(|v| {
            v.iter()
                .filter_map(|e| Some(e["shown_ms"].as_i64()? - e["event_ms"].as_i64()?))
                .collect()
        })
        .unwrap_or_default();
    ll.sort_unstable();
    if ll.is_empty() {
        bail!(
            "no site changed state while the overview was open ({} s)",
            a.watch
        );
    }
    let live_p99 = percentile(&ll, 0.99);
    eprintln!(
        "L: {} changes shown, p50 {} ms, p99 {live_p99} ms",
        ll.len(),
        percentile(&ll, 0.5)
    );
    drop(b);
    let _ = sim.kill();
    let _ = sim.wait();
    ctl.stop()?;
    println!(
        "dashboard sites={} api_sites_p99_ms={api_p99:.1} page_load_ms={page_ms} live_update_ms={live_p99}",
        a.sites
    );
    Ok(())
}
