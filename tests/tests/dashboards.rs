//! Issue 18: the Grafana dashboards and Prometheus rules in `dashboards/`, against a real
//! Prometheus. promtool checks the shipped configs and rules and runs the rules' unit tests; the
//! dashboards' JSON is what `dashboards/generate.py` (grafana-foundation-sdk's typed builders)
//! writes, and well formed; and every query of every panel, run against a Prometheus that
//! scrapes a running demo controller (simulated sites, a conference with a publisher and a
//! viewer, a standby, transfers, backups), returns data: at that Prometheus, at a second one it
//! sends everything to with remote_write, and at VictoriaMetrics (the long-term store).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tiandi_tests::{ControllerProc, bin, free_tcp, free_udp, wait_for};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn dashboards_dir() -> PathBuf {
    repo().join("dashboards")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (sudo scripts/test --install-only installs it)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// The shipped Prometheus configs, with `/etc/prometheus/` pointing into `dir` (which gets the
/// rules and the files the configs name), checked by `promtool check config`.
fn install_configs(dir: &Path) -> BTreeMap<String, String> {
    std::fs::create_dir_all(dir.join("rules")).unwrap();
    std::fs::create_dir_all(dir.join("tiandi")).unwrap();
    std::fs::copy(
        dashboards_dir().join("rules/tiandi.rules.yml"),
        dir.join("rules/tiandi.rules.yml"),
    )
    .unwrap();
    std::fs::write(dir.join("tiandi/metrics.token"), "t0ken\n").unwrap();
    std::fs::write(dir.join("tiandi/ca.pem"), "").unwrap();
    let mut out = BTreeMap::new();
    for name in ["prometheus", "province", "federate"] {
        let text = std::fs::read_to_string(dashboards_dir().join(format!("prometheus/{name}.yml")))
            .unwrap()
            .replace("/etc/prometheus/", &format!("{}/", dir.display()));
        let path = dir.join(format!("{name}.yml"));
        std::fs::write(&path, &text).unwrap();
        run(Command::new("promtool")
            .args(["check", "config"])
            .arg(&path));
        out.insert(name.to_string(), text);
    }
    out
}

#[test]
fn promtool_checks_the_configs_and_rules_and_the_rules_pass_their_unit_tests() {
    let tmp = tempfile::tempdir().unwrap();
    install_configs(tmp.path());
    let rules = dashboards_dir().join("rules");
    let check = run(Command::new("promtool")
        .args(["check", "rules"])
        .arg(rules.join("tiandi.rules.yml")));
    assert!(check.contains("SUCCESS"), "{check}");
    let tests = run(Command::new("promtool")
        .args(["test", "rules", "tiandi.test.yml"])
        .current_dir(rules.join("tests")));
    assert!(tests.contains("SUCCESS"), "{tests}");
    // The example Alertmanager config: valid, critical alerts reach the ministry's NOC and the
    // province's desk, the others only the province's.
    let am = dashboards_dir().join("alertmanager.example.yml");
    run(Command::new("amtool").args(["check-config"]).arg(&am));
    let routes = |labels: &[&str]| {
        run(Command::new("amtool")
            .args(["config", "routes", "test"])
            .arg(format!("--config.file={}", am.display()))
            .args(labels))
        .lines()
        .filter(|l| !l.starts_with("Warning"))
        .collect::<String>()
    };
    assert_eq!(
        routes(&[
            "severity=critical",
            "province=SC",
            "alertname=TiandiSiteDown"
        ]),
        "ministry-noc,province-desk"
    );
    assert_eq!(
        routes(&["severity=warning", "province=SC"]),
        "province-desk"
    );

    // Every alert has a severity, a summary and a dashboard that exists.
    let uids: BTreeSet<String> = dashboards()
        .iter()
        .map(|(_, d)| d["uid"].as_str().unwrap().to_string())
        .collect();
    let text = std::fs::read_to_string(rules.join("tiandi.rules.yml")).unwrap();
    let mut alerts = 0;
    for block in text.split("- alert: ").skip(1) {
        alerts += 1;
        let name = block.lines().next().unwrap();
        assert!(
            block.contains("severity: critical")
                || block.contains("severity: warning")
                || block.contains("severity: info"),
            "{name}: no severity"
        );
        assert!(block.contains("summary: "), "{name}: no summary");
        let dash = block
            .lines()
            .find_map(|l| l.trim().strip_prefix("dashboard: "))
            .unwrap_or_else(|| panic!("{name}: no dashboard annotation"));
        assert!(uids.contains(dash), "{name}: no dashboard {dash}");
    }
    assert!(alerts >= 15, "{alerts} alerts");
}

/// Every dashboard: (file name, JSON).
fn dashboards() -> Vec<(String, Value)> {
    let mut v: Vec<(String, Value)> = std::fs::read_dir(dashboards_dir().join("grafana"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            (name, json)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// A panel's queries: (panel title, expression, instant?).
fn queries(d: &Value) -> Vec<(String, String, bool)> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                p["title"].as_str().unwrap().to_string(),
                t["expr"].as_str().unwrap().to_string(),
                t["instant"].as_bool().unwrap_or(false),
            ));
        }
    }
    out
}

/// The Python with grafana-foundation-sdk that scripts/test installs.
fn tools_python() -> PathBuf {
    let p = std::env::var_os("TIANDI_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/tiandi-tools"))
        .join("bin/python");
    assert!(
        p.exists(),
        "{} is missing: sudo scripts/test --install-only makes it (a venv with \
         dashboards/requirements.txt)",
        p.display()
    );
    p
}

#[test]
fn the_dashboards_are_what_the_generator_writes_and_well_formed() {
    // The committed JSON is exactly what the typed builders produce.
    run(Command::new(tools_python())
        .arg(dashboards_dir().join("generate.py"))
        .arg("--check"));

    let all = dashboards();
    let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "fleet",
        "site",
        "links",
        "transfers",
        "conferences",
        "backups",
        "controller",
    ] {
        assert!(
            names.contains(&format!("tiandi-{want}.json").as_str()),
            "no {want} dashboard in {names:?}"
        );
    }
    let mut uids = BTreeSet::new();
    for (name, d) in &all {
        assert!(
            uids.insert(d["uid"].as_str().unwrap().to_string()),
            "{name}: uid taken"
        );
        assert!(d["schemaVersion"].as_u64().unwrap() >= 39, "{name}: schema");
        assert!(!d["title"].as_str().unwrap().is_empty());
        let vars: BTreeSet<&str> = d["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert!(vars.contains("datasource"), "{name}: no data-source picker");
        let mut ids = BTreeSet::new();
        let mut bottom = 0;
        for p in d["panels"].as_array().unwrap() {
            let title = p["title"].as_str().unwrap();
            assert!(
                ids.insert(p["id"].as_u64().unwrap()),
                "{name}: panel id of {title} taken"
            );
            let g = &p["gridPos"];
            let (x, w) = (g["x"].as_u64().unwrap(), g["w"].as_u64().unwrap());
            assert!(
                w > 0 && x + w <= 24,
                "{name}/{title}: outside the 24-column grid"
            );
            bottom = bottom.max(g["y"].as_u64().unwrap() + g["h"].as_u64().unwrap());
            if p["type"] == "row" {
                assert_eq!(p["collapsed"], false, "{name}/{title}");
                continue;
            }
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{name}/{title}");
            let targets = p["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{name}/{title}: no query");
            let mut refs = BTreeSet::new();
            for t in targets {
                assert!(
                    refs.insert(t["refId"].as_str().unwrap()),
                    "{name}/{title}: refId"
                );
                let expr = t["expr"].as_str().unwrap();
                // Every variable a query uses is defined (or one of Grafana's own).
                for var in expr.split('$').skip(1) {
                    let v: String = var
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    assert!(
                        v.starts_with("__") || vars.contains(v.as_str()),
                        "{name}/{title}: ${v} is not a variable of the dashboard"
                    );
                }
            }
        }
        assert!(bottom > 8, "{name}: empty");
    }
}

/// A Prometheus-API server (Prometheus or VictoriaMetrics) the test started.
struct Tsdb {
    name: &'static str,
    addr: std::net::SocketAddr,
    child: Child,
}

impl Drop for Tsdb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn prometheus(name: &'static str, dir: &Path, config: &str, extra: &[&str]) -> Tsdb {
    let addr = free_tcp();
    let cfg = dir.join(format!("{name}.yml"));
    std::fs::write(&cfg, config).unwrap();
    run(Command::new("promtool").args(["check", "config"]).arg(&cfg));
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join(format!("{name}-tsdb")).display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).unwrap())
        .spawn()
        .expect("prometheus (apt-get install prometheus; scripts/test does)");
    Tsdb { name, addr, child }
}

fn victoria_metrics(dir: &Path) -> Tsdb {
    let addr = free_tcp();
    let child = Command::new("victoria-metrics")
        .arg(format!("-httpListenAddr={addr}"))
        .arg(format!(
            "-storageDataPath={}",
            dir.join("vm-data").display()
        ))
        .arg("-retentionPeriod=1d")
        .arg("-search.latencyOffset=1s")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("vm.log")).unwrap())
        .spawn()
        .expect("victoria-metrics (apt-get install victoria-metrics; scripts/test does)");
    Tsdb {
        name: "victoriametrics",
        addr,
        child,
    }
}

fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(20)))
        .build()
        .into()
}

/// Runs `expr` at `db` as Grafana would (a range query over the last 10 minutes for a time
/// series, an instant query for a table or a stat): the number of series with a value, or the
/// error.
fn query(db: &Tsdb, expr: &str, instant: bool) -> Result<usize, String> {
    let base = format!("http://{}", db.addr);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let req = if instant {
        http()
            .get(format!("{base}/api/v1/query"))
            .query("query", expr)
    } else {
        http()
            .get(format!("{base}/api/v1/query_range"))
            .query("query", expr)
            .query("start", (now - 600).to_string())
            .query("end", now.to_string())
            .query("step", "5")
    };
    let mut r = req.call().map_err(|e| e.to_string())?;
    let v: Value = r.body_mut().read_json().map_err(|e| e.to_string())?;
    if v["status"] != "success" {
        return Err(format!("{}: {}", v["errorType"], v["error"]));
    }
    let result = v["data"]["result"].as_array().cloned().unwrap_or_default();
    Ok(result
        .iter()
        .filter(|s| {
            s.get("value").is_some() || s["values"].as_array().is_some_and(|a| !a.is_empty())
        })
        .count())
}

/// A query with the dashboard's variables as Grafana would put them.
fn substitute(expr: &str, site: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__range", "10m")
        .replace("$__interval", "15s")
        .replace("$province", ".*")
        .replace("$job", ".*")
        .replace("$site", site)
}

/// `tiandi-video join` into the demo's room as `site` with `args`.
fn join(ctl: &ControllerProc, site: &str, args: &[&str], log: &Path) -> Child {
    let relay = wait_for(
        "the demo's conference relay",
        Duration::from_secs(30),
        || ctl.api("/api/conferences").map(|v| v["relay"].clone()),
    );
    let id = ctl
        .data_dir()
        .join("demo-sites")
        .join(site)
        .join("identity");
    Command::new(bin("tiandi-video"))
        .args(["join", "--relay", relay["address"].as_str().unwrap()])
        .args([
            "--relay-name",
            relay["name"].as_str().unwrap(),
            "--room",
            "demo",
        ])
        .arg("--ca")
        .arg(id.join("ca.crt"))
        .arg("--cert")
        .arg(id.join("site.crt"))
        .arg("--key")
        .arg(id.join("site.key"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("tiandi-video")
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn every_panel_query_returns_data_from_prometheus_its_remote_write_peer_and_victoriametrics() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // The demo: 120 simulated sites reporting every second (rain fades, mains failures, full
    // disks and outages come and go), mutual backups, the conference relay.
    let ctl = ControllerProc::start_demo(&dir.join("ctl"), 120, 1.0, "");
    wait_for("the demo's sites", Duration::from_secs(60), || {
        let v = ctl.api("/api/sites")?;
        (v["sites"].as_array()?.len() >= 120).then_some(())
    });
    // A standby follows it (the replication panels).
    let token = ctl.enroll("dr-standby", "BJ", &["--role", "standby"]);
    let _standby = ControllerProc::start_standby(&dir.join("standby"), ctl.quic, &token, "");
    // A conference: the chair publishes a test picture, a county watches.
    let (chair, viewer) = ("bj-001", "tj-001");
    let _pub = Kill(join(
        &ctl,
        chair,
        &["--publish", "pattern"],
        &dir.join("pub.log"),
    ));
    let play = format!("udp://{}", free_udp());
    let _view = Kill(join(
        &ctl,
        viewer,
        &["--play", &play],
        &dir.join("view.log"),
    ));
    // Transfers: a file to every site, slowly (under way for the whole test), and a small one.
    // (The demo sends from the directory it was started in, never from its data directory.)
    let outgoing = dir.join("files");
    std::fs::create_dir_all(&outgoing).unwrap();
    std::fs::write(outgoing.join("slow.bin"), tiandi_tests::noise(1 << 20, 7)).unwrap();
    std::fs::write(outgoing.join("notice.txt"), "台风预警 — typhoon warning\n").unwrap();
    let sent = ctl.cli(&[
        "send",
        outgoing.join("slow.bin").to_str().unwrap(),
        "--to",
        "all",
        "--rate-limit",
        "0.02",
    ]);
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let sent = ctl.cli(&[
        "send",
        outgoing.join("notice.txt").to_str().unwrap(),
        "--to",
        "site:gd-001",
    ]);
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );

    // The province's Prometheus scrapes the controller every second, evaluates the rules and
    // sends everything on: to the ministry's Prometheus and to VictoriaMetrics.
    let configs = install_configs(&dir.join("etc"));
    assert!(configs["province"].contains("remote_write"));
    let ministry = prometheus(
        "ministry",
        dir,
        "global:\n  scrape_interval: 1s\n",
        &["--web.enable-remote-write-receiver"],
    );
    let vm = victoria_metrics(dir);
    let province = prometheus(
        "province",
        dir,
        &format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n  external_labels:\n    \
             prometheus: province-test\nrule_files:\n  - {rules}\nscrape_configs:\n  - job_name: \
             tiandi-controller\n    static_configs:\n      - targets: ['{ops}']\nremote_write:\n  \
             - url: http://{m}/api/v1/write\n    queue_config:\n      batch_send_deadline: 1s\n  \
             - url: http://{vm}/api/v1/write\n    queue_config:\n      batch_send_deadline: 1s\n",
            rules = dashboards_dir().join("rules/tiandi.rules.yml").display(),
            ops = ctl.ops,
            m = ministry.addr,
            vm = vm.addr,
        ),
        &[],
    );

    // Every query of every panel, at each of the three, until each has returned data (at most
    // 200 s: the first backups, drills and rain fades of the demo come within that).
    let mut all = Vec::new();
    for (name, d) in dashboards() {
        for (title, expr, instant) in queries(&d) {
            all.push((name.clone(), title, expr, instant));
        }
    }
    assert!(all.len() >= 100, "{} queries", all.len());
    let dbs = [&province, &ministry, &vm];
    let mut pending: BTreeSet<(usize, usize)> = (0..all.len())
        .flat_map(|q| (0..dbs.len()).map(move |d| (q, d)))
        .collect();
    let mut last: BTreeMap<(usize, usize), String> = BTreeMap::new();
    let start = Instant::now();
    while !pending.is_empty() && start.elapsed() < Duration::from_secs(200) {
        std::thread::sleep(Duration::from_secs(5));
        // $site: a site with an alarm now (its alarm table has rows), a full disk if any.
        let site = pick_site(&province).unwrap_or_else(|| chair.to_string());
        for &(q, d) in pending.clone().iter() {
            let (_, _, expr, instant) = &all[q];
            let mut exprs = vec![substitute(expr, &site)];
            // A stat's `… or vector(0)` must have data without its fallback too.
            if let Some(main) = exprs[0].strip_suffix(" or vector(0)") {
                exprs.push(main.to_string());
            }
            let results: Vec<_> = exprs.iter().map(|e| query(dbs[d], e, *instant)).collect();
            match results.iter().find(|r| !matches!(r, Ok(n) if *n > 0)) {
                None => {
                    pending.remove(&(q, d));
                }
                Some(r) => {
                    last.insert((q, d), format!("{r:?} (site {site})"));
                }
            }
        }
        eprintln!(
            "{:>3} s: {} of {} queries without data yet",
            start.elapsed().as_secs(),
            pending.len(),
            all.len() * dbs.len()
        );
    }
    let missing: Vec<String> = pending
        .iter()
        .map(|&(q, d)| {
            let (name, title, expr, _) = &all[q];
            format!(
                "{} {name} / {title}: {expr} -> {}",
                dbs[d].name,
                last.get(&(q, d)).map_or("", String::as_str)
            )
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} queries returned no data:\n{}\ncontroller log:\n{}",
        missing.len(),
        all.len() * dbs.len(),
        missing.join("\n"),
        tail(&ctl.log(), 40)
    );
}

/// A site with an active alarm now (a full disk first: those last), as Prometheus has it,
/// among the sites whose UPS reports its runtime (a simulated UPS, like some real ones, may
/// not know it; the site page's runtime panel is then rightly empty). Any site with an alarm
/// if none does.
fn pick_site(db: &Tsdb) -> Option<String> {
    let query = |q: &str| -> Option<Vec<Value>> {
        let mut r = http()
            .get(format!("http://{}/api/v1/query", db.addr))
            .query("query", q)
            .call()
            .ok()?;
        let v: Value = r.body_mut().read_json().ok()?;
        v["data"]["result"].as_array().cloned()
    };
    let rows = query("tiandi_site_alarm and on(site) tiandi_site_ups_runtime_seconds")
        .filter(|r| !r.is_empty())
        .or_else(|| query("tiandi_site_alarm"))?;
    let with = |alarm: &str| {
        rows.iter()
            .find(|s| s["metric"]["alarm"] == alarm)
            .and_then(|s| s["metric"]["site"].as_str().map(str::to_string))
    };
    with("disk-full")
        .or_else(|| with("on-battery"))
        .or_else(|| with("rain-fade"))
        .or_else(|| rows.first()?["metric"]["site"].as_str().map(str::to_string))
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
