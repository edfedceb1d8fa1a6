//! A real Prometheus scrapes the controller's ops listener; `promtool` checks the exposition;
//! per-site series come back through Prometheus's query API with their labels.

use std::process::{Command, Stdio};
use std::time::Duration;

use tiandi_tests::{ControllerProc, free_tcp, get_json, wait_for};

#[test]
fn prometheus_scrapes_site_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = ControllerProc::start(&tmp.path().join("ctl"));
    let mut agent = ctl.new_site(
        &tmp.path().join("agent"),
        "xz-001",
        "XZ",
        "interval_s = 0.5",
    );
    agent.start();
    wait_for("a report", Duration::from_secs(30), || {
        ctl.api("/api/sites/xz-001")?["latest_seq"].as_u64()
    });

    // promtool's linter accepts the exposition.
    let text = ctl.metrics();
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install prometheus; .ci/run does this)");
    use std::io::Write;
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A real Prometheus scrapes it.
    let prom = free_tcp();
    let cfg = tmp.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: tiandi\n    static_configs:\n      - targets: ['{}']\n",
            ctl.ops
        ),
    )
    .unwrap();
    let mut p = Command::new("prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            tmp.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={prom}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus");
    let q = |expr: &str| {
        get_json(&format!("http://{prom}/api/v1/query?query={expr}"))
            .and_then(|v| v["data"]["result"].as_array().cloned())
            .unwrap_or_default()
    };
    let up = wait_for(
        "Prometheus to scrape the controller",
        Duration::from_secs(60),
        || {
            let r = q("tiandi_site_up");
            (!r.is_empty()).then_some(r)
        },
    );
    assert_eq!(up[0]["metric"]["site"], "xz-001");
    assert_eq!(up[0]["metric"]["province"], "XZ");
    assert_eq!(up[0]["value"][1], "1");
    let reports = q("tiandi_reports_total");
    assert!(
        reports[0]["value"][1]
            .as_str()
            .unwrap()
            .parse::<f64>()
            .unwrap()
            >= 1.0
    );
    let mem = q("tiandi_site_memory_used_ratio");
    let v: f64 = mem[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!(v > 0.0 && v < 1.0, "memory ratio {v}");
    let _ = p.kill();
    let _ = p.wait();
    agent.stop();
}
